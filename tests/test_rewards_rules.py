"""Rule-based parts of the reward zoo on hand cases: Flow-GRPO's OCR score, GenEval's rules over
detections (and agreement with the toy world's scorer), the VLM judge's reply parser and its
OpenAI-compatible client."""

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.rewards import build_reward
from diffrl.rewards.geneval import detection, judge
from diffrl.rewards.imaging import to_pil
from diffrl.rewards.ocr import levenshtein, ocr_score, target_text
from diffrl.rewards.vlm_judge import parse_score, parse_yes_no


# ---- OCR (Flow-GRPO) ------------------------------------------------------------------------------
def test_target_text_is_the_first_quoted_span():
    assert target_text('A runway backdrop displaying "Spring Collection 2024". Models walk') == "Spring Collection 2024"
    assert target_text('a sign "Open" and a sign "Closed"') == "Open"
    assert target_text("no quotes at all") == "no quotes at all"  # Flow-GRPO's fallback: the whole prompt


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2),
                                     ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein_hand_cases(a, b, d):
    assert levenshtein(a, b) == levenshtein(b, a) == d


@pytest.mark.parametrize("recognized, target, expected", [
    ("Hello World", "hello world", 1.0),            # spaces and case ignored
    ("xx HELLOWORLD yy", "Hello World", 1.0),       # target contained in the reading: distance 0
    ("helo world", "Hello World", 0.9),             # one deletion over 10 characters
    ("", "Forever Yours", 0.0),                     # nothing read: distance = len(target)
    ("q" * 40, "Yours", 0.0),                       # distance 40 capped at len(target) = 5
    ("Step Goal Achieve", "Step Goal Achieved", 1 - 1 / 16),  # "stepgoalachieved": 16 characters
    ("Lost City Ner", "Lost City Near", 1 - 1 / 12),
])
def test_ocr_score_matches_flow_grpo_formula(recognized, target, expected):
    assert ocr_score(recognized, target) == pytest.approx(expected, abs=1e-12)


def test_ocr_score_of_an_empty_target_is_missing():
    assert math.isnan(ocr_score("anything", "   "))
    scores = build_reward("ocr", recognizer="tests.test_rewards_models:fake_engine")(
        torch.rand(2, 3, 8, 8), ['a sign reading ""', 'reads "OPEN LATE"'], [{}, {"text": "late"}])
    assert math.isnan(scores[0]) and scores[1] == 1.0  # metadata "text" overrides the quoted span


# ---- GenEval rules --------------------------------------------------------------------------------
COUNTING = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
COLOR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                          {"class": "scissors", "count": 1, "color": "black"}]}
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}
DOG = lambda x: detection("dog", (x, 10, x + 20, 30))  # noqa: E731


@pytest.mark.parametrize("meta, objects, correct, partial", [
    (COUNTING, [DOG(0), DOG(40)], True, 1.0),
    (COUNTING, [DOG(0), DOG(40), DOG(80)], False, 0.5 * (1 + 0.5)),  # n = 3 = exclude count: 1 - 1/2
    (COUNTING, [DOG(0)], False, 0.5 * (1 + 0.5)),                   # 1 of 2
    (COUNTING, [detection("cat", (0, 0, 9, 9))], False, 0.0),
    (COLOR, [detection("handbag", (0, 0, 9, 9), "pink"), detection("scissors", (20, 0, 29, 9), "black")], True, 1.0),
    # a blue handbag: class present, pink absent, count 0 of 1 -> (1 + 0 + 0) / 3; scissors fine
    (COLOR, [detection("handbag", (0, 0, 9, 9), "blue"), detection("scissors", (20, 0, 29, 9), "black")], False,
     0.5 * (1 / 3 + 1.0)),
    # cow centre (35, 7), laptop (5, 5): offset (30, 2) shrunk by 0.1 * (10 + 10) -> (28, 0), / |offset| -> 0.93
    (POSITION, [detection("laptop", (0, 0, 10, 10)), detection("cow", (30, 2, 40, 12))], True, 1.0),
    (POSITION, [detection("laptop", (30, 0, 40, 10)), detection("cow", (0, 2, 10, 12))], False, 0.5 * (1 + 2 / 3)),
    # overlapping boxes: offset (4, 0) shrinks to 0 -> no relation
    (POSITION, [detection("laptop", (0, 0, 20, 20)), detection("cow", (4, 0, 24, 20))], False, 0.5 * (1 + 2 / 3)),
])
def test_geneval_rules_on_hand_cases(meta, objects, correct, partial):
    result = judge([meta], [objects])[0]
    assert result.correct is correct
    assert result.partial == pytest.approx(partial)
    for mode, value in (("accuracy", float(correct)), ("partial", partial)):
        reward = build_reward("geneval", detector=lambda images, metadata: [objects], mode=mode)
        assert reward(torch.zeros(1, 3, 8, 8), [meta.get("prompt", "")], [meta]).item() == pytest.approx(value)


def test_geneval_toyworld_detector_equals_the_toy_scorer():
    from diffrl.toyworld import make_prompt_set, render

    rows = make_prompt_set(24, seed=3)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([render(m, rng) for m in rows])).permute(0, 3, 1, 2).float() / 255
    metadata = rows[1:] + rows[:1]  # shifted: mostly wrong, some partial credit
    prompts = [m["prompt"] for m in metadata]
    acc = build_reward("geneval", detector="toyworld")(images, prompts, metadata)
    part = build_reward("geneval", detector="toyworld", mode="partial")(images, prompts, metadata)
    assert torch.equal(acc, build_reward("toyworld_accuracy")(images, prompts, metadata))
    assert torch.equal(part, build_reward("toyworld")(images, prompts, metadata))
    assert 0 < part.mean() < 1 and torch.equal(build_reward("geneval")(images, prompts, rows), torch.ones(24))


def test_geneval_needs_metadata_and_a_known_detector():
    with pytest.raises(ValueError, match="metadata"):
        build_reward("geneval")(torch.zeros(1, 3, 8, 8), ["a dog"])
    with pytest.raises(ValueError, match="include"):
        build_reward("geneval")(torch.zeros(1, 3, 8, 8), ["a dog"], [{"prompt": "a dog"}])
    with pytest.raises(ValueError, match="detector"):
        build_reward("geneval", detector="mask2former")
    with pytest.raises(ValueError, match="mode"):
        build_reward("geneval", mode="strict")


# ---- VLM judge: parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    ("8", 0.8), ("Score: 7/10", 0.7), ("**9**", 0.9), ("I'd rate it 7.5 out of 10.", 0.75),
    ("Rating: 6. There are 2 cats.", 0.6), ("10", 1.0), ("0", 0.0), ("  3/10\n", 0.3),
    ("7 or 8", math.nan), ("eleven", math.nan), ("11", math.nan), ("-2", math.nan), ("", math.nan),
    ("3/10 ... no, 8/10", math.nan), ("I cannot rate images.", math.nan), (None, math.nan), (42, math.nan),
])
def test_parse_score_reads_numbers_and_rejects_malformed_replies(reply, expected):
    got = parse_score(reply)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_parse_score_other_scales_and_yes_no():
    assert parse_score("4", low=1, high=5) == pytest.approx(0.75)
    assert parse_score("4/5", low=1, high=5) == pytest.approx(0.75)
    assert math.isnan(parse_score("0", low=1, high=5))
    assert parse_yes_no("Yes.") == 1.0 and parse_yes_no("no, it does not") == 0.0
    assert parse_yes_no("The answer is yes") == 1.0
    assert parse_yes_no("yes and no") == 1.0  # the first word decides
    assert math.isnan(parse_yes_no("maybe")) and math.isnan(parse_yes_no("It says yes but also no"))
    assert math.isnan(parse_yes_no(None))


# ---- VLM judge: the OpenAI-compatible client ------------------------------------------------------
class _ChatServer(BaseHTTPRequestHandler):
    """Stands in for vLLM & co: records each request and answers with the next scripted body."""

    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, dict(self.headers), body))
        text = body["messages"][0]["content"][1]["text"]
        status, payload = type(self).script[int(text.split("#")[1])]
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatServer.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _completion(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_openai_backend_sends_exact_pixels_and_scores_malformed_replies_as_missing(chat_server):
    _ChatServer.script = [(200, _completion("7/10")), (200, _completion("a banana")), (200, "not json{"),
                          (200, {"choices": []}), (200, _completion("Score: 10"))]
    reward = build_reward("vlm_judge", backend="openai", base_url=chat_server, model="judge-7b", api_key="k",
                          template="Rate #{prompt}# from 0 to 10", concurrency=2)
    images = torch.rand(5, 3, 16, 12)
    scores = reward(images, [str(i) for i in range(5)])
    assert scores[0] == pytest.approx(0.7) and scores[4] == 1.0
    assert torch.isnan(scores[1:4]).all()  # unreadable reply, non-JSON body, no choices: missing, not a crash
    path, headers, body = next(s for s in _ChatServer.seen if "#0#" in s[2]["messages"][0]["content"][1]["text"])
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge-7b" and body["temperature"] == 0
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(sent, np.asarray(to_pil(images[:1])[0]))  # lossless: the judge sees our pixels


def test_openai_backend_errors_are_raised_not_scored(chat_server):
    _ChatServer.script = [(500, {"error": "boom"})]
    reward = build_reward("vlm_judge", backend="openai", base_url=chat_server, template="#{prompt}#")
    with pytest.raises(RuntimeError, match="HTTP 500"):
        reward(torch.rand(1, 3, 8, 8), ["0"])
    dead = build_reward("vlm_judge", backend="openai", base_url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(ConnectionError, match="cannot reach"):
        dead(torch.rand(1, 3, 8, 8), ["x"])
    with pytest.raises(ValueError, match="loopback"):
        build_reward("vlm_judge", backend="openai", base_url="http://judge.example.com/v1")
    build_reward("vlm_judge", backend="openai", base_url="http://judge.example.com/v1", allow_remote=True)

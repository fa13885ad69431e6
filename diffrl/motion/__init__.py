"""Human motion in HumanML3D's conventions: the 22-joint SMPL body skeleton, the 263-d feature layout, physics
measures on joint positions, and a procedural motion world with an exact rule scorer.

Coordinates: metres, y up, the floor at y = 0; at frame 0 the body faces +z with its left on +x; 20 frames a second.
"""

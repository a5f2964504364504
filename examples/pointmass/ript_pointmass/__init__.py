"""An example ript-ablate plug-in, written only against `ript_ablate.interfaces`: a planar point-mass reaching
world with a scripted expert, and a small MLP policy with action and scale heads."""

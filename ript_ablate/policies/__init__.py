"""Built-in policies (plug-ins of `ript_ablate.interfaces.Policy`): `reference`, the small stand-in VLA."""

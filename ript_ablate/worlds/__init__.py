"""Built-in worlds (plug-ins of `ript_ablate.interfaces.World`): `metaworld`, the embedded default."""

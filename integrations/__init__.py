"""Engine integrations (installed as `moe_backend_integrations`): the only engine-specific code."""

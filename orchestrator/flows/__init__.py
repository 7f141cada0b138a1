"""Business flows, one module each, reading like FLOWS.md (steps numbered as there)."""

"""Process-level helpers of the local tools: CPU thread policy and strict JSON files."""

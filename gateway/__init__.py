"""MP169 DSP routing gateway: DUIS parsing, the flag store, the router, its shell and the adapters."""

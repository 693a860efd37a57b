"""MP169 DSP routing gateway: DUIS parsing, the flag store, the pipeline and its adapters."""

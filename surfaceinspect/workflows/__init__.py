"""Multi-step workflows over the engine: --method auto, benchmark, watch, demo."""

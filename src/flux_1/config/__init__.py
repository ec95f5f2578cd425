"""mflux's `flux_1.config` package path (see `flux_1`)."""

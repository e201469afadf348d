"""vwn-harness: build, train and launch Virtual Width Network experiments."""

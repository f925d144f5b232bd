"""edgefleet cloud batch side."""

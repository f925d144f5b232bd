"""Shadow releases on the device (#13): the ``shadowing`` step and its verdict, and the broker-less local shadow."""

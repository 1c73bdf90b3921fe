"""Engine, conversion and error tests."""

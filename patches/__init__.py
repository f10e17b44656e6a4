"""Engine patches, each in its own module with a version guard and an explicit apply()."""

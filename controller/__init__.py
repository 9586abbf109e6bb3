"""The OS-Ken application that compiles middlebox state into OpenFlow rules."""

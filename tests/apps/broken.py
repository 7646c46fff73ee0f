"""A module that fails at import, as one with a bad setting would."""

raise RuntimeError("GDC_TEST_SETTING is not set")

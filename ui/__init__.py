"""The page: tabs, the form codec (controls <-> recipe), the run adapter and result views."""

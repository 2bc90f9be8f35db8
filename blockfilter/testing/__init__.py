"""For tests and demos: the Kaleyra simulator, the pytest plugin, the demo."""

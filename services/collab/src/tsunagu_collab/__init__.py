"""collab: Yjs documents: applies updates in order, persists and compacts them, serves late joiners."""

"""Where shared results live: the share store, the links that open them, PNG metadata."""

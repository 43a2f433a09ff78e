"""One module per user-facing action (backup, restore, verify, ...), like borgmatic's."""

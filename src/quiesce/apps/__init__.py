"""Layer apps: quiescing applications around the window: hooks and database writers."""

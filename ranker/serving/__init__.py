"""Serving: the feeds in the score store (writer), the API's read path (reader, cursor, page cache),
the feed policy math, the HTTP API and its client.

Nothing here imports training code (an import-linter contract); the modules are imported
one by one, so using the writer does not load the web framework.
"""

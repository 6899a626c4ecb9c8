"""The site's stored data and state: image store, scan, ingest, policy, privacy budget, releases."""

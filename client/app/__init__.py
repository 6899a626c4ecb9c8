"""The per-message node app: the ClientApp, its handlers and the mods that guard what leaves the site."""

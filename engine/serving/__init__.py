"""Serving a DALL-E over HTTP: a scheduler that runs every request's images in one continuous batch
(``scheduler``), and the JSON API and web page over it (``api``, ``page.html``); ``serve.py`` starts them."""

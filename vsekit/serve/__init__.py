"""HTTP search over an index: a JSON API and a small web page (``vsekit serve``).

The app is :func:`vsekit.serve.app.create_app`; the limits (``vsekit.serve.limits``) can be read without
importing the web stack.
"""

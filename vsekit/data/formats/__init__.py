"""The data formats, one module each: the format's options class (registered as ``data.format: <name>``), its
reader and, where it has one, its writer (:mod:`vsekit.data.sources` imports them all, which registers them)."""

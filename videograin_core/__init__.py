"""VideoGrain core: plain torch, never imports ComfyUI. Import the submodules directly
(e.g. `from videograin_core.st_layout import layout_attention`); nothing heavy loads here."""

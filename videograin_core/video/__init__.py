"""Video input and output: PyAV decoding through the frame transform (selection, resize,
crop, rotation, pixel aspect) and encoding; region masks from images, mask videos and
sequences aligned with the same transform; the one check that file inputs stay inside the
host's input folder."""

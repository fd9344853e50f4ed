"""The main job without Slicer: chat on CT volumes in-process and write files Slicer opens directly.

``volume_chat`` runs the pipeline over a volume's axial slices, ``outputs`` writes .seg.nrrd / .mrk.json /
overlay PNG / transcript, ``batch`` runs many volumes (resumable, sharded under torchrun).
"""

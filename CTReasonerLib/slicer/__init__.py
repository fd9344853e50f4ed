"""The MRML bridge: chat results -> segments and ROIs in a Slicer scene (imports slicer/vtk, never torch).

geometry     slice index from a view, IJK <-> world through parent transforms, pixel boxes as oriented boxes
segments     the per-volume segmentation node; organ segments written slice by slice, never clobbering
rois         box and closer-look ROIs aligned to the volume
terminology  organ names, colours and Slicer terminology; the shipped colour table
undo         per-edit snapshots of the slices an edit wrote
bridge       ChatResult(s) -> one undoable scene edit
batch        many volumes -> .seg.nrrd + .mrk.json per volume
"""

"""Small reusable parts of SSL methods, pure torch: EMA teachers, CutMix boxes, weight ramps."""

"""Training: cached tower features, the teacher, distilled students and hash heads."""

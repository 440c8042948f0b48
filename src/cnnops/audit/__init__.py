"""The shortcut audit: saliency (where to look), evidence (interventions), verdict, gallery."""

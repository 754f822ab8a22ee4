//! Placeholder: see the helper's work.

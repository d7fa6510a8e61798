//! The event writer (being written).

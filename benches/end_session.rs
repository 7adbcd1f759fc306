//! Placeholder until the criterion bench is written (helper-2 overwrites this).
fn main() {}

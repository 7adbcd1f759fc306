//! Placeholder: the operator CLI is being written.
fn main() {}

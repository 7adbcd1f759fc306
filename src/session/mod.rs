//! A session's life: starting it and its agents, ending it (story 6.5), and
//! reading back what it saved.
pub(crate) mod end;
pub(crate) mod recovery;
pub(crate) mod start;

pub use end::EndSessionReport;
pub use recovery::RecoveryReport;

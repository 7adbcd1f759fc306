//! The values of the status and reason columns, as Rust enums. Each one
//! serializes (serde) and displays as the text stored in its column, such
//! as `"session_end"`.
use std::fmt;
use std::str::FromStr;

use crate::Error;

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[cfg_attr(feature = "web", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The text stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(Error::InvalidInput {
                        field: $what,
                        reason: format!(
                            "{other:?} is not one; known: {}",
                            [$($text),+].join(", ")
                        ),
                    }),
                }
            }
        }
    };
}

text_enum!(
    /// `global_sessions.status`.
    SessionStatus, "session status" {
        /// Open and accepting agents and locks.
        Active => "active",
        /// Open but idle; it can still be ended.
        Paused => "paused",
        /// Left open by a process that died; it can be ended or resumed.
        Interrupted => "interrupted",
        /// Ended with cleanup; final.
        Completed => "completed",
    }
);

text_enum!(
    /// `agent_executions.status`.
    AgentStatus, "agent status" {
        /// Working; may hold locks.
        Running => "running",
        /// Finished its work.
        Completed => "completed",
        /// Stopped by an error.
        Failed => "failed",
        /// Stopped because its session ended first.
        Cancelled => "cancelled",
    }
);

text_enum!(
    /// `resource_locks.release_reason`.
    ReleaseReason, "release reason" {
        /// Released by its holder with `release_lock`.
        Released => "released",
        /// Released because its session ended.
        SessionEnd => "session_end",
        /// Released because its time to live ran out.
        Expired => "expired",
        /// Released because its session was completed or interrupted without it.
        Orphaned => "orphaned",
        /// Released because its agent finished (`finish_agent`).
        AgentFinished => "agent_finished",
    }
);

impl SessionStatus {
    /// The stored names of the open statuses (`active`, `paused`): sessions
    /// whose owner still works in them.
    pub(crate) fn open_names() -> [&'static str; 2] {
        [Self::Active.as_str(), Self::Paused.as_str()]
    }

    /// The stored names of the ended statuses (`completed`, `interrupted`).
    pub(crate) fn ended_names() -> [&'static str; 2] {
        [Self::Completed.as_str(), Self::Interrupted.as_str()]
    }
}

//! Cancel safety, one way for every call: a public call's work (its
//! transaction, its commit, and what follows the commit: announcements,
//! clearing live windows, metrics) runs in a task of its own, and its answer
//! comes back through a channel. Dropping the caller's future (a timeout, a
//! `select!`, a dropped request handler) drops only the wait for that answer:
//! the task runs to its end, so no statement is cut midway, no pooled
//! connection is left checked out mid-reply, and no post-commit step is
//! skipped.
//!
//! An answer nobody received is handed to the call's `undo`, exactly once:
//! by the task when the caller was gone before the answer was sent, or by
//! the dropped caller when the answer was sent but never read. A lock
//! attempt's undo releases its grant or leaves the queue; every other call
//! has nothing to undo, since what it wrote stands as if it had been
//! received.
use std::future::Future;

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::{Error, Result};

/// Runs `work` to its end whatever happens to the caller; its answer.
pub(crate) async fn run<T, W>(work: W) -> Result<T>
where
    W: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    run_or_undo(work, keep).await
}

/// What a call without an undo does with an answer nobody received: keeps
/// what it wrote.
async fn keep<T>(_: T) {}

/// Runs `work` to its end whatever happens to the caller; an answer that
/// succeeded but was never received goes to `undo`, exactly once.
///
/// Outside a tokio runtime there is nothing to spawn on, and `work` runs in
/// the caller's future.
pub(crate) async fn run_or_undo<T, W, U, UF>(work: W, undo: U) -> Result<T>
where
    W: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
    U: FnOnce(T) -> UF + Clone + Send + 'static,
    UF: Future<Output = ()> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return work.await;
    };
    let (reply, answer) = oneshot::channel();
    let task_undo = undo.clone();
    let span = tracing::Span::current();
    runtime.spawn(
        async move {
            let done = work.await;
            if let Err(Ok(unreceived)) = reply.send(done) {
                task_undo(unreceived).await;
            }
        }
        .instrument(span),
    );
    let mut pending = Pending {
        answer: Some(answer),
        undo: Some(undo),
    };
    pending.receive().await
}

/// The caller's side of a detached call: the answer still to be read.
struct Pending<T, U, UF>
where
    U: FnOnce(T) -> UF,
    UF: Future<Output = ()> + Send + 'static,
    T: Send + 'static,
{
    answer: Option<oneshot::Receiver<Result<T>>>,
    undo: Option<U>,
}

impl<T, U, UF> Pending<T, U, UF>
where
    U: FnOnce(T) -> UF,
    UF: Future<Output = ()> + Send + 'static,
    T: Send + 'static,
{
    async fn receive(&mut self) -> Result<T> {
        let Some(answer) = self.answer.as_mut() else {
            return Err(Error::Internal("a detached call was awaited twice".into()));
        };
        let received = answer.await;
        // Received: from here on the answer is the caller's.
        self.answer = None;
        received.map_err(|_| Error::Internal("a call's task ended without an answer".into()))?
    }
}

impl<T, U, UF> Drop for Pending<T, U, UF>
where
    U: FnOnce(T) -> UF,
    UF: Future<Output = ()> + Send + 'static,
    T: Send + 'static,
{
    fn drop(&mut self) {
        let Some(mut answer) = self.answer.take() else {
            return;
        };
        // After `close` the task can no longer send: either its answer is
        // already here (undone below) or the task undoes it itself.
        answer.close();
        let (Ok(Ok(unreceived)), Some(undo)) = (answer.try_recv(), self.undo.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(undo(unreceived));
        }
    }
}

/// Starts `work` in a task of its own without waiting for it: what a `Drop`
/// that must still write (leave a queue) hands its work to.
pub(crate) fn spawn<W>(work: W)
where
    W: Future<Output = ()> + Send + 'static,
{
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work.instrument(tracing::Span::current()));
    }
}

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
//!
//! The tasks of a manager are tracked, so that `close` lets them finish
//! before it closes the pool they use. A panic in the work is resumed in
//! the caller, as if the work had run in its future.
use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{Error, Result};

/// Runs `work` to its end whatever happens to the caller; its answer.
pub(crate) async fn run<T, W>(tasks: &TaskTracker, work: W) -> Result<T>
where
    W: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    run_or_undo(tasks, work, keep).await
}

/// What a call without an undo does with an answer nobody received: keeps
/// what it wrote.
async fn keep<T>(_: T) {}

/// Runs `work` to its end whatever happens to the caller; an answer that
/// succeeded but was never received goes to `undo`, exactly once.
///
/// Outside a tokio runtime there is nothing to spawn on, and `work` runs in
/// the caller's future.
pub(crate) async fn run_or_undo<T, W, U, UF>(tasks: &TaskTracker, work: W, undo: U) -> Result<T>
where
    W: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
    U: FnOnce(T) -> UF + Clone + Send + 'static,
    UF: Future<Output = ()> + Send + 'static,
{
    let Ok(runtime) = Handle::try_current() else {
        return work.await;
    };
    let (reply, answer) = oneshot::channel();
    let task_undo = undo.clone();
    let span = tracing::Span::current();
    let task = tasks.spawn_on(
        async move {
            let done = work.await;
            if let Err(Ok(unreceived)) = reply.send(done) {
                task_undo(unreceived).await;
            }
        }
        .instrument(span),
        &runtime,
    );
    let mut pending = Pending {
        answer: Some(answer),
        task: Some(task),
        undo: Some((undo, runtime, tasks.clone())),
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
    task: Option<JoinHandle<()>>,
    /// The undo, and where to run it should the caller drop the answer.
    undo: Option<(U, Handle, TaskTracker)>,
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
        if let Ok(done) = received {
            return done;
        }
        // The task ended without answering: it panicked (resumed here), or
        // the runtime is shutting down and cancelled it.
        match self.task.take() {
            Some(task) => match task.await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                _ => Err(Error::Internal(
                    "the runtime shut down before the call's work finished".into(),
                )),
            },
            None => Err(Error::Internal("a detached call was awaited twice".into())),
        }
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
        let (Ok(Ok(unreceived)), Some((undo, runtime, tasks))) =
            (answer.try_recv(), self.undo.take())
        else {
            return;
        };
        // The runtime the call was made on, wherever the caller is dropped.
        tasks.spawn_on(undo(unreceived), &runtime);
    }
}

/// Starts `work` in a task of its own without waiting for it: what a `Drop`
/// that must still write (leave a queue) hands its work to.
pub(crate) fn spawn<W>(tasks: &TaskTracker, work: W)
where
    W: Future<Output = ()> + Send + 'static,
{
    match Handle::try_current() {
        Ok(runtime) => {
            tasks.spawn_on(work.instrument(tracing::Span::current()), &runtime);
        }
        Err(_) => tracing::warn!("dropped outside a tokio runtime: its clean-up cannot run"),
    }
}

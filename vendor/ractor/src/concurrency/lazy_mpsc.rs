// Copyright (c) Sean Lawlor
//
// This source code is licensed under both the MIT license found in the
// LICENSE-MIT file in the root directory of this source tree.

//! canopy patch: an unbounded MPSC channel that allocates only what it holds.
//!
//! tokio's unbounded channel allocates its shared state padded to cache lines and a first block
//! of 32 slots when it is created: about 1 KB per channel, two channels per actor, whether the
//! actor ever gets a message or not. With ~100,000 node actors that was ~200 MB. This channel is
//! a mutex-guarded `VecDeque` (empty until the first message) and a waker: under 100 bytes
//! when idle. A send or a receive takes an uncontended lock; an actor's mailbox has one reader.
//!
//! It keeps the semantics ractor relies on: `send` fails once the receiver is closed or dropped;
//! `recv` yields queued messages, then `None` once closed or every sender is gone; receiving
//! spends tokio's cooperative budget like tokio's channels do.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    /// The receiver closed (or was dropped): sends fail.
    closed: bool,
    senders: usize,
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the queue inconsistent (every critical
        // section is a single push, pop or flag change), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending half; cloning it adds a sender.
pub struct UnboundedSender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half.
pub struct UnboundedReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for UnboundedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnboundedSender")
    }
}

impl<T> std::fmt::Debug for UnboundedReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnboundedReceiver")
    }
}

/// A send to a closed channel: the message comes back.
#[derive(Debug, PartialEq, Eq)]
pub struct SendError<T>(pub T);

impl<T> std::fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("channel closed")
    }
}

impl<T: std::fmt::Debug> std::error::Error for SendError<T> {}

/// Why `try_recv` returned nothing.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum TryRecvError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued, and nothing ever will be.
    Disconnected,
}

/// A new channel.
pub fn unbounded_channel<T>() -> (UnboundedSender<T>, UnboundedReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
            senders: 1,
            waker: None,
        }),
    });
    (
        UnboundedSender {
            shared: shared.clone(),
        },
        UnboundedReceiver { shared },
    )
}

impl<T> UnboundedSender<T> {
    /// Queues `value`, or returns it if the receiver closed.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        let waker = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(SendError(value));
            }
            st.queue.push_back(value);
            st.waker.take()
        };
        // Woken outside the lock: the receiver's task may run on this thread at once.
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}

impl<T> Clone for UnboundedSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        UnboundedSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for UnboundedSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            if st.senders == 0 {
                st.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> UnboundedReceiver<T> {
    /// The next message; `None` once the channel is closed or every sender is gone, and
    /// nothing is queued.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next message (see [`Self::recv`]).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut st = self.shared.lock();
        if let Some(v) = st.queue.pop_front() {
            if st.queue.is_empty() && st.queue.capacity() > 64 {
                // A burst grew the queue; an idle mailbox should not keep it.
                st.queue = VecDeque::new();
            }
            coop.made_progress();
            return Poll::Ready(Some(v));
        }
        if st.closed || st.senders == 0 {
            coop.made_progress();
            return Poll::Ready(None);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut st = self.shared.lock();
        match st.queue.pop_front() {
            Some(v) => Ok(v),
            None if st.closed || st.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuses further sends; what is queued can still be received.
    pub fn close(&mut self) {
        self.shared.lock().closed = true;
    }
}

impl<T> Drop for UnboundedReceiver<T> {
    fn drop(&mut self) {
        // Queued messages are dropped here, outside the senders' view: taken out first so that
        // a message's own drop (which may send elsewhere) does not run under this lock.
        let queued = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.waker = None;
            std::mem::take(&mut st.queue)
        };
        drop(queued);
    }
}

//! A subscriber's resume cursor: the last position delivered to the application, what to ask
//! the hub for after a reconnect, and the filter that drops duplicates and reports gaps.
//! Pure — the ChannelActor drives it.

use tether_transport::protocol::{Attached, Epoch, Gap, Offset, Position};

/// What to do with an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The next message: deliver it.
    Deliver,
    /// Already delivered (at or below the cursor): drop it.
    Duplicate,
    /// Something is missing before it: report the gap, then deliver it.
    GapThenDeliver(Gap),
}

/// The last delivered position of one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeCursor {
    position: Option<Position>,
}

impl ResumeCursor {
    /// A cursor that has delivered nothing yet (the first attach starts at the live head).
    pub fn new() -> Self {
        ResumeCursor::default()
    }

    /// Where to resume from on the next attach.
    pub fn resume_from(&self) -> Option<Position> {
        self.position.clone()
    }

    /// The hub confirmed an attach; the replay that follows starts after `head - replay`.
    /// Returns the gap to report, if any: the hub's, or one the hub failed to report (never
    /// silent either way).
    pub fn on_attached(&mut self, attached: &Attached) -> Option<Gap> {
        let replay_start = Offset(attached.head.0.saturating_sub(attached.replay));
        let new_position = Position {
            epoch: attached.epoch.clone(),
            offset: replay_start,
        };
        let gap = match (&self.position, &attached.gap) {
            (_, Some(gap)) => Some(gap.clone()),
            (None, None) => None,
            (Some(mine), None) if mine.epoch != attached.epoch => Some(Gap {
                from: Position {
                    epoch: mine.epoch.clone(),
                    offset: mine.offset.next(),
                },
                to: Position {
                    epoch: attached.epoch.clone(),
                    offset: replay_start,
                },
            }),
            // The log is behind what we delivered (it lost its tail without a new epoch):
            // its next numbers are not ones we have seen, so move back and say so.
            (Some(mine), None) if attached.head < mine.offset => Some(Gap {
                from: Position {
                    epoch: attached.epoch.clone(),
                    offset: attached.head.next(),
                },
                to: mine.clone(),
            }),
            (Some(mine), None) if replay_start > mine.offset => Some(Gap {
                from: Position {
                    epoch: mine.epoch.clone(),
                    offset: mine.offset.next(),
                },
                to: new_position.clone(),
            }),
            // Same epoch, the replay starts at or before our cursor: overlap is filtered as
            // duplicates, so keep our (further) position.
            (Some(_), None) => return None,
        };
        self.position = Some(new_position);
        gap
    }

    /// Judges a message at `(epoch, offset)`, advancing the cursor when it is delivered.
    pub fn accept(&mut self, epoch: &Epoch, offset: Offset) -> Verdict {
        let verdict = match &mut self.position {
            None => Verdict::Deliver,
            Some(mine) if mine.epoch == *epoch => {
                if offset <= mine.offset {
                    return Verdict::Duplicate;
                } else if offset == mine.offset.next() {
                    // The common case: the next message of the same epoch.
                    mine.offset = offset;
                    return Verdict::Deliver;
                } else {
                    Verdict::GapThenDeliver(Gap {
                        from: Position {
                            epoch: epoch.clone(),
                            offset: mine.offset.next(),
                        },
                        to: Position {
                            epoch: epoch.clone(),
                            offset: Offset(offset.0 - 1),
                        },
                    })
                }
            }
            Some(mine) => Verdict::GapThenDeliver(Gap {
                from: Position {
                    epoch: mine.epoch.clone(),
                    offset: mine.offset.next(),
                },
                to: Position {
                    epoch: epoch.clone(),
                    offset: Offset(offset.0.saturating_sub(1)),
                },
            }),
        };
        self.position = Some(Position {
            epoch: epoch.clone(),
            offset,
        });
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(s: &str) -> Epoch {
        Epoch(s.into())
    }

    fn attached(epoch: &str, head: u64, replay: u64, gap: Option<Gap>) -> Attached {
        Attached {
            channel: "c".into(),
            epoch: e(epoch),
            head: Offset(head),
            resumed: gap.is_none(),
            replay,
            gap,
        }
    }

    #[test]
    fn first_attach_starts_at_the_head_and_delivers_in_order() {
        let mut c = ResumeCursor::new();
        assert_eq!(c.on_attached(&attached("a", 10, 0, None)), None);
        assert_eq!(c.accept(&e("a"), Offset(11)), Verdict::Deliver);
        assert_eq!(c.accept(&e("a"), Offset(12)), Verdict::Deliver);
        assert_eq!(c.accept(&e("a"), Offset(12)), Verdict::Duplicate);
        assert_eq!(c.accept(&e("a"), Offset(3)), Verdict::Duplicate);
        assert_eq!(
            c.resume_from(),
            Some(Position {
                epoch: e("a"),
                offset: Offset(12)
            })
        );
    }

    #[test]
    fn a_resume_replay_continues_exactly() {
        let mut c = ResumeCursor::new();
        c.on_attached(&attached("a", 0, 0, None));
        for i in 1..=5 {
            c.accept(&e("a"), Offset(i));
        }
        // Reconnect: the hub replays 6..=9.
        assert_eq!(c.on_attached(&attached("a", 9, 4, None)), None);
        assert_eq!(c.accept(&e("a"), Offset(6)), Verdict::Deliver);
    }

    #[test]
    fn gaps_are_reported_never_skipped_silently() {
        let mut c = ResumeCursor::new();
        c.on_attached(&attached("a", 0, 0, None));
        c.accept(&e("a"), Offset(1));
        match c.accept(&e("a"), Offset(4)) {
            Verdict::GapThenDeliver(gap) => {
                assert_eq!((gap.from.offset, gap.to.offset), (Offset(2), Offset(3)))
            }
            other => panic!("{other:?}"),
        }
        // A hub that replays from further on than our cursor without saying so.
        assert!(c.on_attached(&attached("a", 20, 5, None)).is_some());
        // An epoch change the hub did not report.
        let gap = c.on_attached(&attached("b", 3, 3, None)).unwrap();
        assert_eq!(gap.from.epoch, e("a"));
        assert_eq!(
            gap.to,
            Position {
                epoch: e("b"),
                offset: Offset(0)
            }
        );
        assert_eq!(c.accept(&e("b"), Offset(1)), Verdict::Deliver);
    }

    #[test]
    fn a_log_behind_the_cursor_is_a_gap_and_moves_the_cursor_back() {
        let mut c = ResumeCursor::new();
        c.on_attached(&attached("a", 0, 0, None));
        for i in 1..=5 {
            c.accept(&e("a"), Offset(i));
        }
        let gap = c.on_attached(&attached("a", 3, 0, None)).unwrap();
        assert_eq!((gap.from.offset, gap.to.offset), (Offset(4), Offset(5)));
        assert_eq!(c.accept(&e("a"), Offset(4)), Verdict::Deliver);
    }

    #[test]
    fn the_hubs_gap_is_passed_on() {
        let mut c = ResumeCursor::new();
        c.on_attached(&attached("a", 0, 0, None));
        c.accept(&e("a"), Offset(1));
        let gap = Gap {
            from: Position {
                epoch: e("a"),
                offset: Offset(2),
            },
            to: Position {
                epoch: e("a"),
                offset: Offset(7),
            },
        };
        assert_eq!(
            c.on_attached(&attached("a", 10, 3, Some(gap.clone()))),
            Some(gap)
        );
        assert_eq!(c.accept(&e("a"), Offset(8)), Verdict::Deliver);
    }
}

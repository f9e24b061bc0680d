//! The explorer's command queue (rerun's `CommandSender` is the model). A panel never changes
//! the app, the session or another panel: it sends an [`AppCommand`], and
//! [`super::GanscopeApp::apply`] carries the frame's commands out in one place, in order.

use std::path::{Path, PathBuf};

use super::dialogs::{PathPrompt, Purpose};
use super::{RunView, Settings};
use crate::explore::LatentSpec;
use crate::train::worker::Command;

/// What a panel can ask for.
#[derive(Debug)]
pub enum AppCommand {
    /// A command for the training session.
    Trainer(Command),
    /// A new session: from scratch (`resume: None`) or from a run folder; running or paused.
    Start {
        resume: Option<PathBuf>,
        run: bool,
    },
    /// Drop the session (its thread ends after its current step).
    Stop,
    /// Restart on a dataset folder or file (the preset follows its kind).
    OpenDataset(PathBuf),
    /// A native dialog; its answer goes where `purpose` says.
    Ask {
        purpose: Purpose,
        folder: bool,
        title: &'static str,
    },
    Log(String),
    Error(String),
    DismissError,
    DismissBanner,
    /// Render the explorer image again (`timed`: a user's input asked, so its latency counts).
    RenderLatent {
        timed: bool,
    },
    RenderInterp,
    /// Make the image on screen the interpolation's A (`b: false`) or B end.
    SetEndpoint {
        b: bool,
    },
    /// A pasted latent: z and the condition.
    ApplyLatent(LatentSpec),
    /// Principal directions of the newest generator for the current condition.
    FindDirections,
    /// Show this kept wall frame (None: the newest, live).
    Scrub(Option<usize>),
    /// Read the condition list named in the composer's path field.
    LoadConditionList,
    /// Write the interpolation strip (PNG) or its animation (GIF).
    ExportInterp {
        gif: bool,
    },
    /// Draw the Scene tab's sequence again.
    RenderScene,
    /// Write the scene's sequence as a strip PNG or a GIF.
    ExportScene {
        gif: bool,
    },
}

/// What a panel gets for one frame: the settings (persisted; a panel edits its own fields),
/// the session's data (read only), the path prompt of the dialogs, and the command queue.
pub struct PanelCtx<'a> {
    pub settings: &'a mut Settings,
    pub run: &'a RunView,
    /// A dialog that answered nothing asks for its path in this field.
    pub prompt: &'a mut Option<PathPrompt>,
    pub commands: &'a mut Vec<AppCommand>,
    /// A session exists (it may still be loading).
    pub has_session: bool,
    /// The folder holding shipped checkpoints.
    pub checkpoints: &'a Path,
    /// Show measured times (snapshot tests turn them off).
    pub show_timings: bool,
}

impl PanelCtx<'_> {
    pub fn send(&mut self, c: AppCommand) {
        self.commands.push(c);
    }

    /// A command for the training session.
    pub fn trainer(&mut self, c: Command) {
        self.send(AppCommand::Trainer(c));
    }

    pub fn log(&mut self, s: impl Into<String>) {
        self.send(AppCommand::Log(s.into()));
    }
}

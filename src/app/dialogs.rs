//! Native file dialogs behind a small trait: rfd on a background thread (a zenity dialog
//! blocks until dismissed; with no portal and no zenity rfd answers `None` at once, the same
//! as a cancel), and a no-op implementation for tests. Every dialog has a path text field
//! beside it in the UI, so a missing dialog backend never blocks the user.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};

/// What a pending dialog's answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    OpenDataset,
    OpenCheckpoint,
    SaveCheckpoint,
    ExportFolder,
    ConditionList,
}

/// A dialog came back without a path: its text field asks for one (and takes the focus once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPrompt {
    pub purpose: Purpose,
    pub focused: bool,
}

/// A single-line path field. While `prompt` is for `purpose` it takes the keyboard focus
/// (once) and shows a line saying to type the path; typing or leaving the field ends that.
pub(crate) fn path_field(
    ui: &mut egui::Ui,
    prompt: &mut Option<PathPrompt>,
    purpose: Purpose,
    text: &mut String,
    hint: &str,
    width: f32,
) -> egui::Response {
    let r = ui.add(
        egui::TextEdit::singleline(text)
            .hint_text(hint)
            .desired_width(width),
    );
    if let Some(p) = prompt.as_mut().filter(|p| p.purpose == purpose) {
        if !p.focused {
            r.request_focus();
            p.focused = true;
        } else if r.changed() || r.lost_focus() {
            *prompt = None;
        }
    }
    r
}

/// The line shown under a prompted path field.
pub(crate) fn prompt_note(ui: &mut egui::Ui, prompt: &Option<PathPrompt>, purpose: Purpose) {
    if prompt.is_some_and(|p| p.purpose == purpose) {
        ui.colored_label(
            egui::Color32::from_rgb(240, 170, 40),
            "No path came from a file dialog: type it in the field above and press Enter.",
        );
    }
}

/// Show `dir` in the desktop's file manager (xdg-open, open, explorer), without waiting for
/// it. The folder is created first if missing (a run folder appears at its first step).
pub fn reveal(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("could not start `{opener}` to show {}: {e}", dir.display()))
}

pub trait Dialogs: Send {
    /// Ask for a folder; the answer (None = cancelled or no dialog backend) arrives later.
    fn pick_folder(&self, title: &str) -> Receiver<Option<PathBuf>>;
    fn pick_file(&self, title: &str) -> Receiver<Option<PathBuf>>;
}

pub struct RfdDialogs;

impl Dialogs for RfdDialogs {
    fn pick_folder(&self, title: &str) -> Receiver<Option<PathBuf>> {
        let (tx, rx) = mpsc::channel();
        let title = title.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(rfd::FileDialog::new().set_title(title).pick_folder());
        });
        rx
    }

    fn pick_file(&self, title: &str) -> Receiver<Option<PathBuf>> {
        let (tx, rx) = mpsc::channel();
        let title = title.to_string();
        std::thread::spawn(move || {
            let _ = tx.send(rfd::FileDialog::new().set_title(title).pick_file());
        });
        rx
    }
}

/// Answers every dialog with `None` (tests; headless use).
pub struct NoDialogs;

impl Dialogs for NoDialogs {
    fn pick_folder(&self, _: &str) -> Receiver<Option<PathBuf>> {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(None);
        rx
    }

    fn pick_file(&self, _: &str) -> Receiver<Option<PathBuf>> {
        self.pick_folder("")
    }
}

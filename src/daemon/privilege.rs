//! Dropping root after the privileged steps of start-up.
//!
//! Owns: the switch from root to `service.user` (setgroups, setgid, setuid, in that order) and
//! the process hardening that goes with it: no core dumps, not ptrace-able or dumpable, umask 077.
//! Must never: run while other threads exist (credentials would differ between threads), leave
//! a way back to root, or be skipped silently when we are root.

use anyhow::{Context as _, bail};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{Gid, Group, Uid, User, setgid, setgroups, setuid};

/// Switches the whole process to `user` (and `group`, or the user's primary group).
pub fn drop_to(user_name: &str, group_name: Option<&str>) -> anyhow::Result<(Uid, Gid)> {
    assert_single_threaded()?;
    let user = User::from_name(user_name)
        .with_context(|| format!("looking up service.user {user_name:?}"))?
        .with_context(|| {
            format!(
                "service.user {user_name:?} does not exist; create it \
                 (useradd -r -s /sbin/nologin -d /var/lib/kunpay {user_name}) or set service.user"
            )
        })?;
    if user.uid.is_root() {
        bail!(
            "service.user {user_name:?} is root; kunpayd must not serve as root, name an unprivileged account"
        );
    }
    let gid = match group_name {
        Some(name) => {
            Group::from_name(name)
                .with_context(|| format!("looking up service.group {name:?}"))?
                .with_context(|| {
                    format!("service.group {name:?} does not exist; create it (groupadd -r {name})")
                })?
                .gid
        }
        None => user.gid,
    };
    // Groups first, then gid, then uid: after setuid we could no longer change the others.
    setgroups(&[]).context("clearing supplementary groups")?;
    setgid(gid).with_context(|| format!("setgid({gid})"))?;
    setuid(user.uid).with_context(|| format!("setuid({})", user.uid))?;
    if setuid(Uid::from_raw(0)).is_ok() || nix::unistd::geteuid().is_root() {
        bail!("privilege drop did not stick: the process could become root again");
    }
    harden()?;
    Ok((user.uid, gid))
}

/// No core files (they would hold key material), no ptrace attach or /proc/PID/mem from the
/// same uid, and files we create are private.
fn harden() -> anyhow::Result<()> {
    nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE, 0)")?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("setrlimit(RLIMIT_CORE, 0)")?;
    umask(Mode::from_bits_truncate(0o077));
    Ok(())
}

fn assert_single_threaded() -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads != 1 {
        bail!(
            "internal error: {threads} threads exist at the privilege drop; it must happen before any thread starts"
        );
    }
    Ok(())
}

//! Options from a TOML file, under flags and environment variables.
//!
//! Every option of a binary is a clap flag with an environment variable. A
//! file named by `--config` (or `OUTBOX_CONFIG`) fills in the options that
//! were given neither way, so the precedence is flags > environment > file >
//! defaults. Keys are the flags' names without the dashes, with `_` or `-`
//! (`batch_size = 500` or `batch-size = 500`). A key the binary does not know
//! or a value its flag would refuse stops the program at start, naming the
//! key.

use std::ffi::OsString;
use std::path::Path;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, Parser};

/// The id of the option that names the file.
const CONFIG_ID: &str = "config";

/// Parses the process's command line into `C`, with options from the file
/// named by `--config`; prints the error and exits (code 2) when it is invalid.
pub fn parse_cli<C: Parser>() -> C {
    parse_cli_with_sections(&[])
}

/// [`parse_cli`] for a binary whose file also has sections of its own
/// (`[[route]]` of the consumer), which it reads itself: their keys are not options.
pub fn parse_cli_with_sections<C: Parser>(sections: &[&str]) -> C {
    try_parse_with_sections(std::env::args_os(), sections).unwrap_or_else(|err| err.exit())
}

/// Parses `args` (program name first) into `C`, with options from the file
/// named by `--config`.
pub fn try_parse_from<C, I, T>(args: I) -> Result<C, clap::Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    try_parse_with_sections(args, &[])
}

/// [`try_parse_from`], leaving the file's `sections` to the caller.
pub fn try_parse_with_sections<C, I, T>(args: I, sections: &[&str]) -> Result<C, clap::Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = C::command();
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command.try_get_matches_from_mut(args.clone())?;
    let Some(path) = matches.get_one::<std::path::PathBuf>(CONFIG_ID) else {
        return C::from_arg_matches(&matches).map_err(|e| e.format(&mut command));
    };
    let path = path.clone();
    let path = path.as_path();
    let table = read_table(&mut command, path)?;
    let mut from_file: Vec<(String, String)> = Vec::new();
    let mut from_file_args: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        if sections.contains(&key.as_str()) {
            continue;
        }
        let id = key.replace('-', "_");
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id().as_str() == id && settable(arg))
            .ok_or_else(|| unknown_key(&command, path, key))?;
        // Flags and environment variables win over the file.
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = arg.get_long().unwrap_or_default();
        let text = match (value, arg.get_action()) {
            (toml::Value::Boolean(on), ArgAction::SetTrue) => {
                if *on {
                    from_file_args.push(format!("--{long}").into());
                }
                continue;
            }
            (toml::Value::String(s), _) => s.clone(),
            (toml::Value::Integer(i), _) => i.to_string(),
            (toml::Value::Float(f), _) => f.to_string(),
            (toml::Value::Boolean(b), _) => b.to_string(),
            _ => {
                return Err(config_error(
                    &mut command,
                    path,
                    format!("key `{key}` must be a string, a number or a boolean"),
                ))
            }
        };
        from_file.push((long.to_string(), key.clone()));
        from_file_args.push(format!("--{long}={text}").into());
    }
    // Right after the program name: options of the top-level command must
    // come before a subcommand (`outbox status`).
    let at = args.len().min(1);
    args.splice(at..at, from_file_args);
    // The flag's own parser judges the value; its message, which names the
    // allowed values, is then given under the file's key.
    C::try_parse_from(args).map_err(|err| {
        let culprit = match err.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => arg
                .trim_start_matches('-')
                .split([' ', '='])
                .next()
                .map(str::to_string),
            _ => None,
        };
        let Some(key) = culprit.and_then(|long| {
            from_file
                .iter()
                .find(|(l, _)| *l == long)
                .map(|(_, key)| key.clone())
        }) else {
            return err;
        };
        let rendered = err.render().to_string();
        let reason = rendered
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        config_error(&mut command, path, format!("key `{key}`: {reason}"))
    })
}

/// Options a file may set: named flags other than `--config`,
/// `--check-config` (a file that only checks itself would never run),
/// `--help`, `--version`.
fn settable(arg: &clap::Arg) -> bool {
    arg.get_long().is_some()
        && arg.get_id().as_str() != CONFIG_ID
        && arg.get_id().as_str() != "check_config"
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpLong | ArgAction::HelpShort | ArgAction::Version
        )
}

fn read_table(command: &mut clap::Command, path: &Path) -> Result<toml::Table, clap::Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| config_error(command, path, format!("cannot read it: {err}")))?;
    text.parse::<toml::Table>()
        .map_err(|err| config_error(command, path, format!("not valid TOML: {err}")))
}

fn unknown_key(command: &clap::Command, path: &Path, key: &str) -> clap::Error {
    let mut allowed: Vec<&str> = command
        .get_arguments()
        .filter(|arg| settable(arg))
        .map(|arg| arg.get_id().as_str())
        .collect();
    allowed.sort_unstable();
    let mut command = command.clone();
    config_error(
        &mut command,
        path,
        format!("unknown key `{key}`; allowed keys: {}", allowed.join(", ")),
    )
}

fn config_error(command: &mut clap::Command, path: &Path, message: String) -> clap::Error {
    command.error(
        ErrorKind::InvalidValue,
        format!("config file {}: {message}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, env = "OUTBOX_CONFIG_TEST_CONFIG")]
        config: Option<std::path::PathBuf>,
        #[arg(long, env = "OUTBOX_CONFIG_TEST_BATCH", default_value_t = 10)]
        batch_size: usize,
        #[arg(long, env = "OUTBOX_CONFIG_TEST_TOPIC", default_value = "t")]
        topic: String,
        #[arg(long, env = "OUTBOX_CONFIG_TEST_HOST", default_value = "h")]
        host: String,
        #[arg(long)]
        drain: bool,
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn file(text: &str) -> std::io::Result<tempfile_like::Temp> {
        tempfile_like::Temp::new(text)
    }

    /// A file removed on drop, without a dev-dependency for it.
    mod tempfile_like {
        pub struct Temp(pub std::path::PathBuf);
        impl Temp {
            pub fn new(text: &str) -> std::io::Result<Self> {
                let path = std::env::temp_dir().join(format!(
                    "outbox-config-test-{}-{}.toml",
                    std::process::id(),
                    uuid::Uuid::new_v4()
                ));
                let mut f = std::fs::File::create(&path)?;
                super::Write::write_all(&mut f, text.as_bytes())?;
                Ok(Self(path))
            }
        }
        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn flags_win_over_env_over_file_over_defaults() -> TestResult {
        let f =
            file("batch-size = 7\ntopic = \"from_file\"\nhost = \"file_host\"\ndrain = true\n")?;
        std::env::set_var("OUTBOX_CONFIG_TEST_TOPIC", "from_env");
        let cli: Cli = try_parse_from([
            "bin".as_ref(),
            "--config".as_ref(),
            f.0.as_os_str(),
            "--host".as_ref(),
            "flag_host".as_ref(),
        ])?;
        std::env::remove_var("OUTBOX_CONFIG_TEST_TOPIC");
        assert_eq!(cli.batch_size, 7, "file over default");
        assert_eq!(cli.topic, "from_env", "env over file");
        assert_eq!(cli.host, "flag_host", "flag over file");
        assert!(cli.drain);
        let cli: Cli = try_parse_from(["bin"])?;
        assert_eq!((cli.batch_size, cli.topic.as_str()), (10, "t"));
        Ok(())
    }

    #[derive(Debug, Parser)]
    struct WithSubcommand {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[arg(long, default_value = "h")]
        host: String,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Status,
    }

    #[test]
    fn file_options_go_before_a_subcommand() -> TestResult {
        let f = file("host = \"from_file\"\n")?;
        let cli: WithSubcommand = try_parse_from([
            "bin".as_ref(),
            "--config".as_ref(),
            f.0.as_os_str(),
            "status".as_ref(),
        ])?;
        assert_eq!(cli.host, "from_file");
        assert!(matches!(cli.command, Sub::Status));
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() -> TestResult {
        let f = file("batch_sise = 7\n")?;
        let err =
            try_parse_from::<Cli, _, _>(["bin".as_ref(), "--config".as_ref(), f.0.as_os_str()])
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown key `batch_sise`"), "{err}");
        assert!(
            err.contains("allowed keys: batch_size, drain, host, topic"),
            "{err}"
        );

        let f = file("batch_size = \"many\"\n")?;
        let err =
            try_parse_from::<Cli, _, _>(["bin".as_ref(), "--config".as_ref(), f.0.as_os_str()])
                .unwrap_err()
                .to_string();
        assert!(err.contains("key `batch_size`"), "{err}");
        assert!(err.contains("many"), "{err}");

        let f = file("batch_size = [1]\n")?;
        let err =
            try_parse_from::<Cli, _, _>(["bin".as_ref(), "--config".as_ref(), f.0.as_os_str()])
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("must be a string, a number or a boolean"),
            "{err}"
        );

        let err = try_parse_from::<Cli, _, _>(["bin", "--config", "/nonexistent/outbox.toml"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/outbox.toml: cannot read it"),
            "{err}"
        );
        Ok(())
    }
}

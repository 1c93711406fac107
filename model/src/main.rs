//! `canopy-model`: the reference model on the command line, in place of `oracle.py` and
//! `compare.py` (docs/SPEC.md section 11).
//!
//!     canopy-model fold INPUT --dump D --dlq Q [--watermarks W]
//!     canopy-model compare EXPECTED_DUMP ACTUAL_DUMP [--dlq EXPECTED ACTUAL] [--watermarks W]
//!
//! Exit status: 0 on success and on a match, 1 on a mismatch, 2 on a usage or input error.

use std::process::ExitCode;

use canopy_model::{compare, fold, load_dead_letters, load_dump, load_watermarks};

const USAGE: &str = "usage: canopy-model fold INPUT --dump D --dlq Q [--watermarks W]\n       canopy-model compare EXPECTED_DUMP ACTUAL_DUMP [--dlq EXPECTED ACTUAL] [--watermarks W]";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("canopy-model: {e}");
            ExitCode::from(2)
        }
    }
}

/// Positional arguments and `--flag VALUE...` options, `n` values per flag.
fn options(
    args: &[String],
    flags: &[(&str, usize)],
) -> Result<(Vec<String>, Vec<(String, Vec<String>)>), String> {
    let (mut pos, mut opts) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(&(flag, n)) = flags.iter().find(|(f, _)| f == a) {
            let values: Vec<String> = it.by_ref().take(n).cloned().collect();
            if values.len() != n {
                return Err(format!("{flag} needs {n} value(s)\n{USAGE}"));
            }
            opts.push((flag.to_string(), values));
        } else if a.starts_with("--") {
            return Err(format!("unknown option {a}\n{USAGE}"));
        } else {
            pos.push(a.clone());
        }
    }
    Ok((pos, opts))
}

fn get<'a>(opts: &'a [(String, Vec<String>)], flag: &str) -> Option<&'a [String]> {
    opts.iter()
        .find(|(f, _)| f == flag)
        .map(|(_, v)| v.as_slice())
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

fn write(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

fn run(args: Vec<String>) -> Result<ExitCode, String> {
    match args.first().map(String::as_str) {
        Some("fold") => {
            let (pos, opts) = options(
                &args[1..],
                &[("--dump", 1), ("--dlq", 1), ("--watermarks", 1)],
            )?;
            let ([input], Some([dump]), Some([dlq])) =
                (pos.as_slice(), get(&opts, "--dump"), get(&opts, "--dlq"))
            else {
                return Err(USAGE.into());
            };
            let bytes = std::fs::read(input).map_err(|e| format!("{input}: {e}"))?;
            let exp = fold(&bytes);
            write(dump, &exp.dump_text())?;
            write(dlq, &exp.dead_letters_text())?;
            if let Some([w]) = get(&opts, "--watermarks") {
                write(w, &exp.watermarks_text())?;
            }
            eprintln!("duplicates ignored: {}", exp.duplicates);
            Ok(ExitCode::SUCCESS)
        }
        Some("compare") => {
            let (pos, opts) = options(&args[1..], &[("--dlq", 2), ("--watermarks", 1)])?;
            let [expected, actual] = pos.as_slice() else {
                return Err(USAGE.into());
            };
            let exp = load_dump(&read(expected)?, expected).map_err(|e| e.to_string())?;
            let act = load_dump(&read(actual)?, actual).map_err(|e| e.to_string())?;
            let (e_dl, a_dl) = match get(&opts, "--dlq") {
                Some([e, a]) => (
                    load_dead_letters(&read(e)?, e).map_err(|e| e.to_string())?,
                    load_dead_letters(&read(a)?, a).map_err(|e| e.to_string())?,
                ),
                _ => Default::default(),
            };
            let wm = match get(&opts, "--watermarks") {
                Some([w]) => Some(
                    load_watermarks(&read(w)?)
                        .ok_or_else(|| format!("{w}: not a watermarks object"))?,
                ),
                _ => None,
            };
            match compare(exp, &act, &e_dl, &a_dl, wm.as_ref()) {
                Ok(m) => {
                    println!("{m}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(mismatch) => {
                    println!("{mismatch}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        _ => Err(USAGE.into()),
    }
}

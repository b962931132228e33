# Sourced first by the scripts in slurm/ (from the repository root). Sites whose jobs start with a bare environment
# (sbatch --export=NONE) or need `module load` / a venv: a script of yours, sourced here. MV_ENV_SETUP names it
# (sbatch --export=NONE,MV_ENV_SETUP=$HOME/mv_env.sh ...), else slurm/env.sh is used when it exists (not tracked).
env_setup=${MV_ENV_SETUP:-slurm/env.sh}
if [ -f "$env_setup" ]; then
    # shellcheck disable=SC1090
    source "$env_setup"
elif [ -n "${MV_ENV_SETUP:-}" ]; then
    echo "error: MV_ENV_SETUP=$MV_ENV_SETUP does not exist (a script to source: module load ..., source venv/bin/activate)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}

# JupyterHub configuration for jobtunnel: a hub scope that opens tunnels and nothing else.
#
# A job carries a hub token, and everything that runs in the job can read it. So the token a
# job gets is worth almost nothing: only `custom:jobtunnel:connect!user` (this user's tunnels),
# which the forwarder requires by default, refusing tokens that can do more. The notebook
# mints it (jobtunnel.dask.ensure_token_secret, called by OffloadedKubeCluster) with its own
# server token, which therefore needs `tokens!user` (the right to create tokens for its own
# user; the hub caps their scopes at the user's own).
#
# Load it from your jupyterhub_config.py (`load_subconfig("/path/to/this/file")`), or with
# Zero to JupyterHub put the same in hub.config and hub.loadRoles (see z2jh-values.yaml).
# It adds to `load_roles`: if your configuration already defines the `user` or `server`
# role, merge these scopes into yours instead. tests/jupyterhub.py starts the real hub of the
# test suite with this file.
c = get_config()  # noqa: F821

c.JupyterHub.custom_scopes = {
    "custom:jobtunnel:connect": {
        "description": "Open jobtunnel tunnels for your offloaded Dask schedulers, nothing else.",
    },
}
c.JupyterHub.load_roles.extend(
    [
        {
            "name": "user",
            "description": "Default permissions for users, and opening their own tunnels",
            "scopes": ["self", "custom:jobtunnel:connect!user"],
        },
        {
            "name": "server",
            "description": "Single-user servers: post activity, and mint their user's job tokens",
            "scopes": ["users:activity!user", "access:servers!server", "tokens!user"],
        },
    ]
)

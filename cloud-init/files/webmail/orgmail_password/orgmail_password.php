<?php
/**
 * orgmail: a user whose password is still the one from the configuration (mail clients are refused it)
 * is taken to the password page after logging in, and kept there by the password plugin until the
 * password is changed (its `newuserpassword` preference, cleared on a successful change).
 */
class orgmail_password extends rcube_plugin
{
    public $task = 'login';

    function init()
    {
        $this->add_hook('login_after', [$this, 'login_after']);
    }

    function login_after($args)
    {
        $rcmail = rcmail::get_instance();
        try {
            $response = $rcmail->get_http_client()->request('POST', 'http://127.0.0.1:8026/initial', [
                'form_params' => ['user' => $rcmail->get_user_name(), 'curpass' => $rcmail->decrypt($_SESSION['password'])],
                'http_errors' => false,
                'timeout' => 30,
            ]);
        } catch (Exception $e) {
            rcube::raise_error(['code' => 500, 'message' => 'orgmail-passwd: ' . $e->getMessage()], true, false);
            return $args;
        }
        if (trim((string) $response->getBody()) === 'initial') {
            $rcmail->user->save_prefs(['newuserpassword' => true]);
            $args['_task'] = 'settings';
            $args['_action'] = 'plugin.password';
            $args['_first'] = 'true';
        }
        return $args;
    }
}
